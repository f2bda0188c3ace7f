// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
package android.view;

import android.content.Context;

public class View {
    public View(Context context) {
        throw new UnsupportedOperationException("declaration only");
    }

    public void setPadding(int left, int top, int right, int bottom) {
        throw new UnsupportedOperationException("declaration only");
    }

    public boolean isEnabled() {
        throw new UnsupportedOperationException("declaration only");
    }

    public void setEnabled(boolean enabled) {
        throw new UnsupportedOperationException("declaration only");
    }

    public void setOnClickListener(OnClickListener l) {
        throw new UnsupportedOperationException("declaration only");
    }

    public boolean post(Runnable action) {
        throw new UnsupportedOperationException("declaration only");
    }

    public final int getBottom() {
        throw new UnsupportedOperationException("declaration only");
    }

    public void scrollTo(int x, int y) {
        throw new UnsupportedOperationException("declaration only");
    }

    public interface OnClickListener {
        void onClick(View v);
    }
}
