// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.widget;

import android.content.Context;
import android.view.View;

public class TextView extends View {
    public TextView(Context context) {
        super(context);
        throw new UnsupportedOperationException("declaration only");
    }

    public CharSequence getText() {
        throw new UnsupportedOperationException("declaration only");
    }

    public final void setText(CharSequence text) {
        throw new UnsupportedOperationException("declaration only");
    }

    public final void append(CharSequence text) {
        throw new UnsupportedOperationException("declaration only");
    }

    public CharSequence getHint() {
        throw new UnsupportedOperationException("declaration only");
    }

    public final void setHint(CharSequence hint) {
        throw new UnsupportedOperationException("declaration only");
    }

    public void setTextIsSelectable(boolean selectable) {
        throw new UnsupportedOperationException("declaration only");
    }
}
