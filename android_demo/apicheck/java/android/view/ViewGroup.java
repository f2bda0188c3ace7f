// Declaration only (android_demo/apicheck/README.md): the members the app shell uses, as in the Android API.
// Real: also implements ViewParent, ViewManager.
package android.view;

import android.content.Context;

public abstract class ViewGroup extends View {
    public ViewGroup(Context context) {
        super(context);
        throw new UnsupportedOperationException("declaration only");
    }

    public void addView(View child) {
        throw new UnsupportedOperationException("declaration only");
    }

    public void addView(View child, LayoutParams params) {
        throw new UnsupportedOperationException("declaration only");
    }

    public static class LayoutParams {
        public static final int MATCH_PARENT = -1;
        public static final int WRAP_CONTENT = -2;

        public LayoutParams(int width, int height) {
            throw new UnsupportedOperationException("declaration only");
        }
    }

    public static class MarginLayoutParams extends LayoutParams {
        public MarginLayoutParams(int width, int height) {
            super(width, height);
            throw new UnsupportedOperationException("declaration only");
        }
    }
}
